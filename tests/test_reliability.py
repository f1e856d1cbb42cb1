"""Reliability: outputs shareable, one line instead of tracebacks, no user file destroyed, no debris left.

Each test names the defect it pins down. Outputs are checked end to end through the CLI (CliRunner, and
the console script in a subprocess where the process boundary matters: kills, Typer's own errors).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import disk_full_on_second_write, invoke

CRDIFF = Path(sys.executable).parent / "crdiff"
PRUNE = ["prune", "--model", "tiny", "--ratios", "0.2/0.2/0.2", "--unet-only"]
GENERATE = ["generate", "--model", "tiny", "--res", "32x32", "--steps", "1", "--prompt", "a red cube"]
SEARCH = ["search", "--model", "tiny", "--res", "32x32", "--scorer", "tiny", "--steps", "1", "--iters", "1",
          "--prompt", "a red cube"]
BAKE = ["bake", "--model", "tiny", "--res", "32x32", "--ratios", "0.2/0.2/0.2", "--no-verify"]


def one_line_error(result, *needles: str) -> str:
    """The result is exit 2 with exactly one ``error:`` line containing every needle, and no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model load fail the test: the checks under test must refuse before one."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("crdiff_cli.pipelines.loading.load_model", boom)


@pytest.fixture
def umask_027():
    """A umask that is neither tempfile's private 077 nor the common 022, so permissions must come from it."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mount_tmpfs(folder: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nothing can be created in: a read-only tmpfs as root, a 0555 folder otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not _mount_tmpfs(folder, "ro,size=1m"):
        pytest.skip("running as root without permission to mount: no way to make a read-only folder")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(kib)``: a tmpfs folder of that size (root with mount permission only)."""
    mounted = []

    def make(kib: int) -> Path:
        folder = tmp_path / f"fs{kib}"
        folder.mkdir()
        if not _mount_tmpfs(folder, f"size={kib}k"):
            pytest.skip("needs root with mount permission to make a small file system")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


# --- 1. outputs get the user's umask, not tempfile's private modes ------------------------------------------

def _assert_umask_modes(root: Path):
    for name, mode in modes(root).items():
        want = 0o750 if (root.parent / name).is_dir() else 0o640
        assert mode == want, (name, oct(mode))


def test_prune_output_gets_umask_permissions(tiny_dirs, tmp_path, umask_027):
    assert invoke(*PRUNE, "--out", tmp_path / "pruned").exit_code == 0
    _assert_umask_modes(tmp_path / "pruned")


def test_search_profile_and_trace_get_umask_permissions(tiny_dirs, tmp_path, umask_027):
    result = invoke(*SEARCH, "--out", tmp_path / "best.json")
    assert result.exit_code == 0, result.output
    for name in ("best.json", "best.trace.png", "best.journal.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_tiny_model_cache_gets_umask_permissions(tmp_path, monkeypatch, umask_027):
    from crdiff_cli.pipelines.tiny import tiny_model_path

    monkeypatch.setenv("CRDIFF_CACHE", str(tmp_path / "cache"))
    folder = tiny_model_path("tiny")
    _assert_umask_modes(folder)
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o750


def test_bake_artifact_gets_umask_permissions(tiny_dirs, tmp_path, umask_027):
    assert invoke(*BAKE, "--out", tmp_path / "a.safetensors").exit_code == 0
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o640


# --- 2. one line instead of a traceback ----------------------------------------------------------------------

@pytest.mark.parametrize("command, out", [(PRUNE, "pruned"), (BAKE, "a.safetensors"), (GENERATE, "images"),
                                          (SEARCH, "best.json")])
def test_unwritable_output_is_refused_before_loading(readonly_dir, no_model_load, command, out):
    one_line_error(invoke(*command, "--out", readonly_dir / out), "cannot write in", "choose another --out")


EVALUATE = ["evaluate", "--model", "tiny", "--res", "32x32", "--steps", "1", "--prompt", "a red cube",
            "--metrics", "tiny", "--variants", "dense"]


@pytest.mark.parametrize("command, out", [(PRUNE, "pruned"), (BAKE, "a.safetensors"), (GENERATE, "images"),
                                          (SEARCH, "best.json"), (EVALUATE, "eval")])
def test_missing_parent_folders_are_made_before_loading(tmp_path, no_model_load, command, out):
    """Like mkdir -p: the checks pass (the model load is reached) and the folders exist, with the umask's mode."""
    result = invoke(*command, "--out", tmp_path / "new" / "deeper" / out)
    assert "a model was loaded before the arguments were checked" in str(result.exception), result.output
    assert (tmp_path / "new" / "deeper").is_dir()


@pytest.mark.parametrize("command, out", [(PRUNE, "pruned"), (BAKE, "a.safetensors"), (GENERATE, "images"),
                                          (SEARCH, "best.json"), (EVALUATE, "eval")])
def test_a_parent_that_is_a_file_is_refused_before_loading(tmp_path, no_model_load, command, out):
    (tmp_path / "file").write_text("user data")
    one_line_error(invoke(*command, "--out", tmp_path / "file" / "sub" / out), "is not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "user data"


def test_missing_folders_under_a_read_only_one_are_refused(readonly_dir, no_model_load):
    one_line_error(invoke(*GENERATE, "--out", readonly_dir / "new" / "images"), "cannot write in")
    assert not (readonly_dir / "new").exists()


def test_generate_into_new_nested_folders(tiny_dirs, tmp_path):
    assert invoke(*GENERATE, "--out", tmp_path / "a" / "b" / "images").exit_code == 0
    assert (tmp_path / "a" / "b" / "images" / "manifest.json").is_file()


def test_full_file_system_is_refused_before_loading(small_fs, no_model_load):
    folder = small_fs(256)  # less than atomic.MIN_FREE_BYTES
    one_line_error(invoke(*PRUNE, "--out", folder / "pruned"), "no space left")


def test_file_system_filling_up_mid_write_is_one_line_and_leaves_nothing(tiny_dirs, small_fs):
    folder = small_fs(1280)  # passes the free-space check, too small for the tiny UNet's weights
    one_line_error(invoke(*PRUNE, "--out", folder / "pruned"), "cannot write", "no space left")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("Error while serializing: IoError(Os { code: 28, kind: "
                                                  "StorageFull, message: \"No space left on device\" })")])
def test_write_failures_of_any_writer_are_one_line(tiny_dirs, tmp_path, monkeypatch, failure):
    from diffusers import UNet2DConditionModel

    def fail(self, folder, **kwargs):
        (Path(folder) / "partial.bin").write_bytes(b"x")
        raise failure

    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", fail)
    one_line_error(invoke(*PRUNE, "--out", tmp_path / "pruned"), "cannot write", "no space left")
    assert list(tmp_path.iterdir()) == []


def test_disk_filling_up_during_generate_is_one_line_and_keeps_finished_images(tiny_dirs, tmp_path, monkeypatch):
    import crdiff_cli.pipelines.to_folder as to_folder

    disk_full_on_second_write(monkeypatch, to_folder)
    result = invoke(*GENERATE, "--num-images", "2", "--out", tmp_path / "images")
    assert result.exit_code == 2 and "Traceback" not in result.output  # stderr also holds the progress bars
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and "no space left" in errors[0], result.stderr
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["0_0.png"]


@pytest.mark.parametrize("device, message", [("gpu0", "is not a device"), ("cuda", "cannot use CUDA"),
                                             ("cuda:7", "CUDA")])
@pytest.mark.parametrize("command", [GENERATE, SEARCH])
def test_bad_or_missing_devices_exit_2_before_loading(tmp_path, no_model_load, command, device, message):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU-only case cannot happen here")
    one_line_error(invoke(*command, "--out", tmp_path / "x", "--device", device), message)


@pytest.mark.parametrize("content, message", [("[1, 2]", "not a crdiff profile"), ("42", "not a crdiff profile"),
                                              ('{"format": "crdiff-profile/1"}', "lacks the 'name' field"),
                                              ('{"format": "crdiff-profile/1", "name": "x", "resolution": '
                                               '"64x64", "ratios": {"down": 0.1, "mid": 0.1, "up": 0.1}}',
                                               "lacks the 'family' field")])
def test_malformed_profile_files_are_one_line(tmp_path, no_model_load, content, message):
    (tmp_path / "p.json").write_text(content)
    one_line_error(invoke("prune", "--model", "tiny", "--profile", tmp_path / "p.json", "--out", tmp_path / "o"),
                   message)


@pytest.mark.parametrize("out", [".", ".."])
def test_out_of_the_working_folder_is_refused(tmp_path, monkeypatch, no_model_load, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    one_line_error(invoke(*PRUNE, "--out", out, "--overwrite"), "the folder you are working in")
    assert (work / "notes.txt").read_text() == "mine"


# --- 3. a file that is not a journal is never modified ---------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"a red cube\n", b'{"format": "something else"}\n'])
@pytest.mark.parametrize("flags", [["--resume"], ["--overwrite"]])
def test_search_never_modifies_a_file_that_is_not_a_journal(tmp_path, no_model_load, content, flags):
    journal = tmp_path / "prompts.txt"
    journal.write_bytes(content)
    before = journal.stat()
    one_line_error(invoke(*SEARCH, "--out", tmp_path / "best.json", "--journal", journal, *flags),
                   str(journal), "never modifies it")
    assert journal.read_bytes() == content and journal.stat().st_mtime_ns == before.st_mtime_ns


# --- 4. and 6. --out and --overwrite only ever replace crdiff's own outputs ------------------------------------

def test_generate_refuses_a_folder_with_other_files_even_with_overwrite(tmp_path, no_model_load):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"not crdiff's")
    for flags in ([], ["--overwrite"]):
        one_line_error(invoke(*GENERATE, "--out", out, *flags), "not a generate output folder written by crdiff")
    assert [p.name for p in out.iterdir()] == ["holiday.png"]


def test_generate_replaces_its_previous_output_only_with_overwrite(tiny_dirs, tmp_path):
    out = tmp_path / "images"
    out.mkdir()  # an empty folder is fine
    first = invoke(*GENERATE, "--out", out, "--num-images", "2", "--compare")
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == ["0_0.png", "0_0_dense.png", "0_1.png", "0_1_dense.png",
                                                     "compare_0.png", "manifest.json"]
    one_line_error(invoke(*GENERATE, "--out", out), "already exists", "--overwrite")
    again = invoke(*GENERATE, "--out", out, "--overwrite", "--seed", "5")
    assert again.exit_code == 0, again.output
    assert "wrote 1 image (" in again.stdout  # singular
    assert sorted(p.name for p in out.iterdir()) == ["0_5.png", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "crdiff-images/1" and [i["file"] for i in manifest["images"]] == ["0_5.png"]


def test_prune_overwrite_refuses_a_folder_that_is_not_a_pruned_model(tmp_path, no_model_load):
    models = tmp_path / "models"
    models.mkdir()
    (models / "sd15.safetensors").write_bytes(b"precious")
    one_line_error(invoke(*PRUNE, "--out", models, "--overwrite"), "not a pruned model folder written by crdiff",
                   "crdiff_prune.json")
    assert (models / "sd15.safetensors").read_bytes() == b"precious"


def test_prune_overwrite_replaces_a_previous_prune(tiny_dirs, tmp_path):
    out = tmp_path / "pruned"
    assert invoke(*PRUNE, "--out", out).exit_code == 0
    one_line_error(invoke(*PRUNE, "--out", out), "already exists")
    assert invoke(*PRUNE, "--out", out, "--overwrite", "--dtype", "fp16").exit_code == 0
    assert json.loads((out / "crdiff_prune.json").read_text())["dtype"] == "float16"


def test_bake_overwrite_refuses_a_safetensors_file_that_is_not_an_artifact(tmp_path, no_model_load):
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(model))
    before = model.read_bytes()
    one_line_error(invoke(*BAKE, "--out", model, "--overwrite"), "not a crdiff artifact written by crdiff")
    assert model.read_bytes() == before


def test_search_overwrite_refuses_foreign_profile_and_trace(tmp_path, no_model_load):
    (tmp_path / "best.json").write_text('{"my": "settings"}')
    one_line_error(invoke(*SEARCH, "--out", tmp_path / "best.json", "--overwrite"), "not a profile written by crdiff")
    (tmp_path / "best.json").unlink()
    (tmp_path / "best.trace.png").write_bytes(b"\x89PNG not ours")
    one_line_error(invoke(*SEARCH, "--out", tmp_path / "best.json", "--overwrite"), "not a search trace")
    assert (tmp_path / "best.trace.png").read_bytes() == b"\x89PNG not ours"


# --- 5. stale staging of killed processes is cleaned by the next run, and only that -----------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_clean_stale_removes_only_crdiff_staging_of_dead_processes(tmp_path):
    from crdiff_cli.storage.atomic import _machine_tag, clean_stale

    tag = _machine_tag()
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.crdiff-tmp-{tag}-{dead}-abc"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"x" * 100)
    keep = [tmp_path / f".out.crdiff-tmp-{tag}-{alive}-abc",  # a live process is still writing it
            tmp_path / f".out.crdiff-tmp-{'0' * 8}{tag[8:]}-{dead}-abc",  # another host (shared folder)
            tmp_path / f".out.tmp-{dead}-abc",  # not crdiff's marker
            tmp_path / "user.crdiff-tmp-notes"]
    for path in keep:
        path.mkdir()
    previous_boot = tmp_path / f".b.crdiff-tmp-{tag[:8]}{'0' * 8}-{alive}-abc"  # pid reused after a reboot
    previous_boot.write_bytes(b"x")
    set_aside = tmp_path / f".model.crdiff-old-{tag}-{dead}"  # killed between the two renames
    set_aside.mkdir()
    (set_aside / "crdiff_prune.json").write_text("{}")
    assert sorted(clean_stale(tmp_path)) == sorted([stale, previous_boot])
    assert all(p.exists() for p in keep) and not stale.exists() and not previous_boot.exists()
    assert (tmp_path / "model" / "crdiff_prune.json").exists() and not set_aside.exists()


@pytest.mark.slow
def test_staging_of_a_killed_bake_is_removed_by_the_next_run(tiny_dirs, tmp_path, crdiff_cache):
    env = {**os.environ, "CRDIFF_CACHE": str(crdiff_cache)}
    out = tmp_path / "a.safetensors"
    cmd = [str(CRDIFF), "bake", "--model", "tiny", "--res", "32x32", "--ratios", "0.2/0.2/0.2", "--out", str(out)]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = []
    while not staged and child.poll() is None:
        staged = [p for p in tmp_path.iterdir() if ".crdiff-tmp-" in p.name and p.is_dir()]
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if not staged:
        pytest.fail("bake finished before its staging folder was seen; the test could not kill it mid-write")
    assert [p for p in tmp_path.iterdir() if ".crdiff-tmp-" in p.name], "SIGKILL should leave the staging behind"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


# --- 7. every argument check before a model load ----------------------------------------------------------------

@pytest.mark.parametrize("command, args, message", [
    (PRUNE, ["--profile", "sd15@400x560"], "--ratios and --profile both given"),
    (["prune", "--model", "tiny"], [], "--ratios missing; pass --ratios D/M/U, --profile NAME, or --res HxW"),
    (BAKE, ["--profile", "sd15@400x560"], "--ratios and --profile both given"),
    (GENERATE, ["--ratios", "0.1/0.1/0.1", "--profile", "sd15@400x560"], "--ratios and --profile both given"),
])
def test_ratio_source_is_checked_before_loading(tmp_path, no_model_load, command, args, message):
    out = tmp_path / ("a.safetensors" if command is BAKE else "out")
    one_line_error(invoke(*command, *args, "--out", out), message)


# --- 8. a profile made for another resolution warns -------------------------------------------------------------

def test_profile_for_another_resolution_warns(tiny_dirs, tmp_path):
    result = invoke("prune", "--model", "tiny", "--unet-only", "--profile", "sd15@400x560", "--res", "512x512",
                    "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "warning: profile sd15@400x560 was made for 400x560 (HxW), not --res 512x512" in result.stderr


# --- 9. empty prompts and non-finite numbers ----------------------------------------------------------------------

@pytest.mark.parametrize("command", [GENERATE, SEARCH])
@pytest.mark.parametrize("flag, value", [("--prompt", ""), ("--prompt", "  \t "), ("--negative-prompt", " ")])
def test_empty_prompts_exit_2(tmp_path, no_model_load, command, flag, value):
    args = [a for a in command if a not in ("--prompt", "a red cube")] + ([] if flag == "--prompt" else
                                                                         ["--prompt", "x"])
    one_line_error(invoke(*args, flag, value, "--out", tmp_path / "o"), f"{flag} is empty")


@pytest.mark.parametrize("command, flag", [(GENERATE, "--guidance"), (GENERATE, "--k"), (SEARCH, "--guidance"),
                                           (SEARCH, "--t-init"), (SEARCH, "--fail-score"), (SEARCH, "--k"),
                                           (BAKE, "--k")])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_exit_2(tmp_path, no_model_load, command, flag, value):
    one_line_error(invoke(*command, flag, value, "--out", tmp_path / "o.safetensors"), flag, "finite")


def test_generation_settings_refuse_nan_guidance():
    from crdiff_cli.errors import CrdiffError
    from crdiff_cli.pipelines.generation import GenerationSettings
    from crdiff_cli.pruning.resolution import Resolution

    with pytest.raises(CrdiffError, match="finite"):
        GenerationSettings(Resolution(64, 64), guidance=float("nan"))


@pytest.mark.parametrize("command, args, needle", [
    (GENERATE, ["--seed", "18446744073709551616"], "--seed 18446744073709551616 is out of range"),
    (GENERATE, ["--seed", "18446744073709551615", "--num-images", "2"], "--seed + --num-images - 1"),
    (GENERATE, ["--seed", "-9223372036854775809"], "is out of range"),
    (EVALUATE, ["--seed", "18446744073709551616"], "--seed 18446744073709551616 is out of range"),
    (SEARCH, ["--seed", "18446744073709551616"], "--seed 18446744073709551616 is out of range"),
    (GENERATE, ["--steps", "99999999999"], "--steps 99999999999 is out of range"),
    (EVALUATE, ["--num-images", "99999999999"], "--num-images 99999999999 is out of range"),
    (SEARCH, ["--iters", "99999999999"], "--iters 99999999999 is out of range"),
    (BAKE, ["--opset", "99999999999"], "--opset 99999999999 is out of range"),
])
def test_integers_out_of_range_exit_2_before_loading(tmp_path, no_model_load, command, args, needle):
    out = tmp_path / ("o.safetensors" if command is BAKE else "o.json" if command is SEARCH else "o")
    one_line_error(invoke(*command, *args, "--out", out), needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps, strength, needed", [("1", "0.5", "2"), ("4", "0.2", "5"), ("2", None, "2")])
def test_img2img_that_would_denoise_nothing_exits_2_before_loading(tmp_path, no_model_load, steps, strength, needed):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "init.png")
    args = ["--steps", steps, "--init-image", tmp_path / "init.png"] + (["--strength", strength] if strength else [])
    args = [a for a in GENERATE if a not in ("--steps", "1")] + args
    if strength is None:  # the default strength, 0.8, with 1 step: int(0.8) = 0
        args[args.index("--steps") + 1] = "1"
    line = one_line_error(invoke(*args, "--out", tmp_path / "o"), "--strength", "denoises", "= 0 times")
    assert f"raise --steps to at least {needed}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.png"]


# --- 10. messages ---------------------------------------------------------------------------------------------------

def test_missing_profile_file_says_it_does_not_exist(tmp_path, no_model_load):
    prune = ["prune", "--model", "tiny", "--out", tmp_path / "o"]
    line = one_line_error(invoke(*prune, "--profile", "./nope.json"), "profile file nope.json does not exist")
    assert "sd15@" not in line  # no list of built-in names for a path
    one_line_error(invoke(*prune, "--profile", "sd99@1x1"), "unknown profile")


def test_hub_errors_are_cut_at_a_word_boundary():
    from crdiff_cli.errors import first_line

    text = first_line(ValueError("word " * 100))
    assert text.endswith("word...") and len(text) <= 203


def test_resume_with_other_prompts_says_the_prompts_differ(tmp_path):
    from crdiff_cli.errors import CrdiffError
    from crdiff_cli.storage.journal import check_identity

    with pytest.raises(CrdiffError, match=r"\(the prompts differ\)") as info:
        check_identity(tmp_path / "j", {"identity": {"prompts": 1, "prompts_sha256": "a" * 64, "steps": 2}},
                       {"prompts": 2, "prompts_sha256": "b" * 64, "steps": 2})
    assert "a" * 20 not in str(info.value)


def test_unet_or_artifact_as_model_suggests_artifact(tiny_dirs, tmp_path):
    import shutil

    unet = tmp_path / "unet.safetensors"
    shutil.copy(tiny_dirs["tiny"] / "unet" / "diffusion_pytorch_model.safetensors", unet)
    one_line_error(invoke(*PRUNE, "--model", unet, "--out", tmp_path / "o"), "holds only a UNet", "--artifact")
    assert invoke(*BAKE, "--out", tmp_path / "a.safetensors").exit_code == 0
    one_line_error(invoke(*PRUNE, "--model", tmp_path / "a.safetensors", "--out", tmp_path / "o"),
                   "is a crdiff artifact", "--artifact")
    (tmp_path / "a.onnx").write_bytes(b"x")
    one_line_error(invoke(*PRUNE, "--model", tmp_path / "a.onnx", "--out", tmp_path / "o"), "--artifact")


@pytest.mark.parametrize("args, message", [(["generate", "--bogus"], "No such option: --bogus"),
                                           (["generate", "--steps", "x"], "Invalid value for '--steps'"),
                                           (["prune"], "Missing option '--model'"),
                                           (["nope"], "No such command 'nope'")])
def test_typer_usage_errors_are_one_line(args, message):
    one_line_error(invoke(*args), message, "--help`")
    done = subprocess.run([str(CRDIFF), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr


def test_crdiff_alone_still_prints_the_help():
    done = subprocess.run([str(CRDIFF)], capture_output=True, text=True)
    assert "Usage: crdiff" in done.stdout + done.stderr and "generate" in done.stdout + done.stderr


# --- 11. help -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["prune", "search", "bake", "generate", "evaluate", "profiles"])
def test_help_fits_80_columns_and_flags_read_as_flags(command):
    done = subprocess.run([str(CRDIFF), command, "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and max(len(line) for line in lines) <= 80
    assert len(lines) <= 100 and "<bool>" not in done.stdout and "╭" not in done.stdout
    assert "list[str]" not in done.stdout  # repeatable flags show what they take (PATH[:SCALE])
    flag = {"prune": "--unet-only", "search": "--resume", "bake": "--verify / --no-verify", "generate": "--dense",
            "evaluate": "--resume", "profiles": "--help"}[command]
    assert any(line.split()[:len(flag.split())] == flag.split() or line.strip().startswith(f"-h, {flag}")
               for line in lines if line.strip().startswith(("-", flag))), done.stdout


def test_top_level_help_gives_each_command_a_whole_phrase():
    done = subprocess.run([str(CRDIFF), "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    commands = done.stdout.split("Commands:", 1)[1].strip().splitlines()
    assert len(commands) == 7 and all(line.rstrip().endswith(".") and "..." not in line for line in commands)


def test_trace_plots_the_score_rising_with_labelled_axes(tiny_dirs, tmp_path):
    from PIL import Image

    from crdiff_cli.search.trace_plot import BLUE, LEFT, TOP

    result = invoke(*SEARCH, "--out", tmp_path / "best.json", "--iters", "6", "--init", "0.1/0.1/0.1")
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "best.trace.png")
    title = json.loads(image.text["crdiff"])["title"]
    assert "model tiny" in title and "scorer tiny" in title
    rgb = image.convert("RGB")
    panel_bottom = TOP + 14 + (rgb.size[1] - TOP - 44 - 34) * 3 // 5
    blue = [(x, y) for x in range(LEFT, rgb.size[0]) for y in range(TOP, panel_bottom) if rgb.getpixel((x, y)) == BLUE]
    first, last = min(blue), max(blue)
    assert last[1] <= first[1]  # the best score so far only rises: its line ends highest
