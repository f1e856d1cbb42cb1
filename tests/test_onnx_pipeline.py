"""ONNX pipeline folders (`crdiff bake --format onnx-pipeline`) and the torch-free runner (`generate --pipeline`).

Oracles: the live PyTorch pipeline with CR-Diff applied (same prompt, seed, scheduler and steps) within 2/255;
diffusers' own ``OnnxStableDiffusionPipeline`` on the same folder; the in-process runner for the runner in a
process where torch, diffusers and transformers cannot be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pruning.resolution import Resolution
from helpers import invoke, ok, run

pytest.importorskip("onnxruntime")

PROMPT = "a red fox in the snow"
BLOCKED = ("torch", "diffusers", "transformers", "onnx")  # onnxruntime is a package of its own
# Runs crdiff's CLI in a process where importing torch, diffusers or transformers raises ImportError.
NO_TORCH = f"""
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ImportError(name + " is blocked: the runner must not import it")

sys.meta_path.insert(0, Blocked())
from crdiff_cli.cli import main
sys.argv[0] = "crdiff"
main()
"""


def bake_folder(root: Path, model: str, res: str, *extra) -> Path:
    out = root / f"{model}-pipeline"
    ok(invoke("bake", "--model", model, "--res", res, "--format", "onnx-pipeline", "--out", out, "--ratios",
              "0.4/0.3/0.2", "--k", "1.3", *extra))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_dirs) -> dict[str, Path]:
    """Both tiny models baked and verified (the CLI's --verify runs the whole folder) at 64x64."""
    root = tmp_path_factory.mktemp("pipelines")
    return {name: bake_folder(root, name, "64x64") for name in ("tiny", "tiny-sdxl")}


def live_image(loaded, folder: Path, height: int, width: int, scheduler=None, seed: int = 3, steps: int = 2):
    """The live PyTorch CR-Diff image with the folder's ratios and k."""
    from crdiff_cli.dual.apply import apply_crdiff
    from crdiff_cli.pruning.ratios import Ratios

    record = json.loads((folder / "crdiff.json").read_text())
    apply_crdiff(loaded.pipe, Ratios.from_dict(record["ratios"]), k=record["k"])
    from crdiff_cli.pipelines.schedulers import set_scheduler

    set_scheduler(loaded.pipe, scheduler)
    return generate_image(loaded.pipe, PROMPT, seed, GenerationSettings(Resolution(height, width), steps))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_layout_and_record(folders, tiny_readonly):
    """The ONNX Runtime / Optimum layout, a config.json per model, and crdiff.json with every file's SHA-256."""
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.spec import PruneSpec
    from crdiff_cli.storage.digest_cache import file_sha256

    for name, folder in folders.items():
        encoders = ["text_encoder", "text_encoder_2"] if name == "tiny-sdxl" else ["text_encoder"]
        for component in [*encoders, "unet", "vae_decoder", "vae_encoder"]:
            assert (folder / component / "model.onnx").is_file() and (folder / component / "config.json").is_file()
        tokenizers = ["tokenizer", "tokenizer_2"] if name == "tiny-sdxl" else ["tokenizer"]
        for tokenizer in tokenizers:
            assert (folder / tokenizer / "tokenizer.json").is_file()
        assert (folder / "scheduler" / "scheduler_config.json").is_file()
        index = json.loads((folder / "model_index.json").read_text())
        assert index["unet"] == ["diffusers", "OnnxRuntimeModel"] and "text_encoder_2" in index or name == "tiny"
        record = json.loads((folder / "crdiff.json").read_text())
        spec = PruneSpec.from_unet(tiny_readonly[name].unet, Ratios.parse("0.4/0.3/0.2"))
        assert record["k"] == 1.3 and record["thresholds"] == spec.thresholds()
        assert record["resolution"] == {"height": 64, "width": 64}
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"crdiff.json"}
        assert set(record["files"]) == on_disk
        assert all(file_sha256(folder / f) == digest for f, digest in record["files"].items())


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)], ids=["native", "non-native"])
def test_folder_image_equals_live_pipeline(folders, load_tiny, name, size):
    """Same prompt, seed, scheduler and steps: the runner's image is the live CR-Diff image within 2/255; the
    seed gives the same starting noise (PyTorch's CPU generator reproduced in numpy)."""
    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline

    runner = OnnxCrdiffPipeline.from_folder(folders[name], provider="cpu")
    ours = runner(PROMPT, seeds=3, steps=2, height=size[0], width=size[1])[0]
    live = live_image(load_tiny(name), folders[name], *size)
    assert ours.size == live.size == (size[1], size[0])
    assert np.abs(pixels(ours) - pixels(live)).max() <= 2


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpm++"])
def test_other_schedulers_equal_live_pipeline(folders, load_tiny, scheduler):
    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline

    runner = OnnxCrdiffPipeline.from_folder(folders["tiny"], provider="cpu")
    ours = runner(PROMPT, seeds=5, steps=3, scheduler=scheduler)[0]
    live = live_image(load_tiny("tiny"), folders["tiny"], 64, 64, scheduler=scheduler, seed=5, steps=3)
    assert np.abs(pixels(ours) - pixels(live)).max() <= 2


def test_cli_without_torch_equals_in_process_runner(folders, tmp_path):
    """`crdiff generate --pipeline` where importing torch, diffusers or transformers raises: the same images."""
    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline

    for name, folder in folders.items():
        out = tmp_path / name
        result = run(sys.executable, "-c", NO_TORCH, "generate", "--pipeline", folder, "--prompt", PROMPT, "--seed",
                     "4", "--num-images", "2", "--steps", "2", "--out", out)
        assert result.returncode == 0, result.stderr
        runner = OnnxCrdiffPipeline.from_folder(folder, provider="cpu")
        for seed in (4, 5):
            expected = runner(PROMPT, seeds=seed, steps=2)[0]
            assert np.array_equal(pixels(expected), pixels(_open(out / f"0_{seed}.png")))
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["run"]["model"]["runtime"] == "onnxruntime (torch-free)" and len(manifest["images"]) == 2


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def test_diffusers_onnx_pipeline_loads_the_folder(folders):
    """diffusers' OnnxStableDiffusionPipeline reads the folder as it is; its image equals the runner's (same
    latents, the base model's PNDM scheduler)."""
    diffusers = pytest.importorskip("diffusers")
    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline

    folder = folders["tiny"]
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    theirs = diffusers.OnnxStableDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider")
    theirs.set_progress_bar_config(disable=True)
    image = theirs(PROMPT, num_inference_steps=3, height=64, width=64, latents=latents).images[0]
    ours = OnnxCrdiffPipeline.from_folder(folder, provider="cpu")(PROMPT, steps=3, latents=latents)[0]
    assert np.abs(pixels(image) - pixels(ours)).max() <= 1


def test_io_binding_gives_identical_outputs(folders):
    """The bound path (what GPU providers use) and the plain one agree bit for bit on the CPU."""
    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline

    folder = folders["tiny-sdxl"]
    plain = OnnxCrdiffPipeline.from_folder(folder, provider="cpu", bind=False)(PROMPT, seeds=1, steps=2)[0]
    bound = OnnxCrdiffPipeline.from_folder(folder, provider="cpu", bind=True)(PROMPT, seeds=1, steps=2)[0]
    assert np.array_equal(pixels(plain), pixels(bound))


def test_one_runner_serves_concurrent_requests(folders):
    """A service loads once and calls from several threads: each request gets the image it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline

    runner = OnnxCrdiffPipeline.from_folder(folders["tiny-sdxl"], provider="cpu")
    requests = [("a red fox", 1), ("a blue bird", 2), ("a green frog", 3)]
    alone = [pixels(runner(prompt, seeds=seed, steps=2)[0]) for prompt, seed in requests]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda r: pixels(runner(r[0], seeds=r[1], steps=2)[0]), requests))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_graphsurgeon_folding_leaves_outputs_identical(folders, tmp_path):
    """What NVIDIA's TensorRT demo does to an ONNX UNet before building (cleanup, fold_constants) changes nothing."""
    gs = pytest.importorskip("onnx_graphsurgeon")
    import onnx
    import onnxruntime as ort

    source = folders["tiny"] / "unet" / "model.onnx"
    graph = gs.import_onnx(onnx.load(str(source)))
    graph.cleanup().toposort()
    graph.fold_constants().cleanup()
    folded = tmp_path / "model_optimized.onnx"
    onnx.save(gs.export_onnx(graph), str(folded))
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.array([500], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
               for p in (source, folded)]
    assert np.array_equal(*outputs)


@pytest.fixture
def copy_of(folders, tmp_path):
    def copy(name: str = "tiny") -> Path:
        target = tmp_path / f"copy-{name}"
        shutil.copytree(folders[name], target)
        return target

    return copy


def _generate(folder: Path, out: Path, *extra):
    return invoke("generate", "--pipeline", folder, "--prompt", PROMPT, "--steps", "1", "--out", out, *extra)


def _refused(result, words: str, out: Path) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    message = result.stderr.strip()
    assert words in message and "\n" not in message and "Traceback" not in message, message
    assert not out.exists()


def test_changed_file_refused_by_digest(copy_of, tmp_path):
    folder = copy_of()
    data = (folder / "unet" / "model.onnx").read_bytes()
    (folder / "unet" / "model.onnx").write_bytes(data[: len(data) // 2])
    _refused(_generate(folder, tmp_path / "out"), "does not match the SHA-256", tmp_path / "out")


def test_missing_component_refused(copy_of, tmp_path):
    folder = copy_of()
    shutil.rmtree(folder / "vae_decoder")
    _refused(_generate(folder, tmp_path / "out"), "is missing", tmp_path / "out")


def test_wrong_model_index_refused(copy_of, tmp_path):
    folder = copy_of()
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder"]
    (folder / "model_index.json").write_text(json.dumps(index))
    _refused(_generate(folder, tmp_path / "out"), "names no text_encoder", tmp_path / "out")


def test_swapped_unet_from_another_bake_refused(copy_of, tmp_path, tiny_dirs):
    """A UNet from another bake (other ratios) dropped into the folder is refused by its digest."""
    folder = copy_of()
    ok(invoke("bake", "--model", "tiny", "--res", "64x64", "--out", tmp_path / "other.onnx", "--ratios", "0.1/0.1/0.1",
              "--no-verify"))
    shutil.copy(tmp_path / "other.onnx", folder / "unet" / "model.onnx")
    _refused(_generate(folder, tmp_path / "out"), "does not match the SHA-256", tmp_path / "out")


@pytest.mark.parametrize("extra, words", [
    (["--res", "60x64"], "not a multiple of 8"),
    (["--res", "256x64"], "256x64 (HxW) is outside the sizes this folder was exported for, 32x32 to 96x96"),
    (["--steps", "2000"], "num_inference_steps"),
    (["--steps", "1000"], "the pndm scheduler cannot make 1000 steps"),
    (["--k", "1.0"], "--k does not apply to --pipeline"),
    (["--model", "tiny"], "--model does not apply to --pipeline"),
    (["--scheduler", "heun"], "heun"),
    (["--provider", "tensorrt"], "not available here"),
    (["--num-images", "0"], "--num-images 0 must be at least 1"),
    (["--control-scale", "0.5"], "--control-scale does not apply to --pipeline"),
    (["--poa-interval", "0:0.5"], "this folder's UNet always runs both passes"),
])
def test_bad_generate_options(folders, tmp_path, extra, words):
    _refused(_generate(folders["tiny"], tmp_path / "out", *extra), words, tmp_path / "out")


def test_not_a_pipeline_folder(tmp_path, tiny_dirs):
    _refused(_generate(tiny_dirs["tiny"], tmp_path / "out"), "not a crdiff ONNX pipeline folder", tmp_path / "out")


def test_bake_refuses_before_loading(tmp_path):
    """Bad bake input is one line, exit 2, nothing written (checked before the model loads)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    result = invoke("bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--out", mine,
                    "--overwrite")
    assert result.exit_code == 2 and "not a baked pipeline folder written by crdiff" in result.stderr
    assert (mine / "notes.txt").read_text() == "a user's file"


def test_overwrite_replaces_only_our_folder(folders, tmp_path):
    folder = shutil.copytree(folders["tiny"], tmp_path / "again")
    result = invoke("bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--out", folder,
                    "--no-verify")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    ok(invoke("bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--out", folder,
              "--no-verify", "--overwrite", "--ratios", "0.1/0.1/0.1"))
    assert json.loads((folder / "crdiff.json").read_text())["ratios"]["down"] == 0.1
    assert oct(os.stat(folder / "unet" / "model.onnx").st_mode & 0o777) != "0o600"


def test_triton_repository(folders, tmp_path):
    """`bake --triton`: every config.pbtxt parses with Triton's own schema and agrees with its ONNX graph; the
    runner on the repository's layout (its pipeline folder, models where Triton keeps them) gives the folder's
    image bit for bit."""
    grpc = pytest.importorskip("tritonclient.grpc")
    import onnx
    from google.protobuf import text_format

    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline
    from crdiff_cli.deploy.triton import locate_in, pipeline_dir

    folder, repo = tmp_path / "folder", tmp_path / "repo"
    ok(invoke("bake", "--model", "tiny-sdxl", "--res", "64x64", "--format", "onnx-pipeline", "--out", folder,
              "--triton", repo, "--no-verify"))
    types = {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_FP16": onnx.TensorProto.FLOAT16,
             "TYPE_INT32": onnx.TensorProto.INT32}
    for component in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"):
        config = text_format.Parse((repo / f"crdiff_{component}" / "config.pbtxt").read_text(),
                                   grpc.model_config_pb2.ModelConfig())
        assert config.name == f"crdiff_{component}" and config.backend == "onnxruntime"
        graph = onnx.load(str(repo / f"crdiff_{component}" / "1" / "model.onnx"), load_external_data=False).graph
        for declared, values in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in declared] == [v.name for v in values]
            for tensor, value in zip(declared, values):
                shape = value.type.tensor_type.shape.dim
                assert types[grpc.model_config_pb2.DataType.Name(tensor.data_type)] == value.type.tensor_type.elem_type
                assert list(tensor.dims) == [d.dim_value if d.HasField("dim_value") else -1 for d in shape]
    python = text_format.Parse((repo / "crdiff" / "config.pbtxt").read_text(), grpc.model_config_pb2.ModelConfig())
    assert python.backend == "python" and [o.name for o in python.output] == ["image"]
    assert (repo / "crdiff" / "1" / "model.py").read_text().count("TritonPythonModel") == 1
    through_repo = OnnxCrdiffPipeline.from_folder(pipeline_dir(repo, "crdiff"), provider="cpu",
                                                  locate=locate_in(repo, "crdiff"))
    direct = OnnxCrdiffPipeline.from_folder(folder, provider="cpu")
    assert np.array_equal(pixels(through_repo(PROMPT, seeds=2, steps=2)[0]),
                          pixels(direct(PROMPT, seeds=2, steps=2)[0]))


def test_tensorrt_conventions(folders, tmp_path):
    """--tensorrt-conventions: output `latent`, scalar `timestep`, the same image; TENSORRT.md has the shapes."""
    import onnx

    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline

    folder = tmp_path / "trt"
    ok(invoke("bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--out", folder, "--ratios",
              "0.4/0.3/0.2", "--k", "1.3", "--tensorrt-conventions"))
    graph = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False).graph
    assert [o.name for o in graph.output] == ["latent"]
    assert len(next(i for i in graph.input if i.name == "timestep").type.tensor_type.shape.dim) == 0
    recipe = (folder / "TENSORRT.md").read_text()
    assert "not yet run on a GPU" in recipe and "--trt-opt-shapes sample:[2,4,8,8]" in recipe
    assert "--trt-min-shapes sample:[1,4,4,4]" in recipe and "--minShapes=sample:1x4x4x4" in recipe
    assert "--maxShapes=sample:8x4x12x12" in recipe and "timestep:" not in recipe
    ours = OnnxCrdiffPipeline.from_folder(folder, provider="cpu")(PROMPT, seeds=6, steps=2)[0]
    plain = OnnxCrdiffPipeline.from_folder(folders["tiny"], provider="cpu")(PROMPT, seeds=6, steps=2)[0]
    assert np.array_equal(pixels(ours), pixels(plain))



def test_fp16_folder(tmp_path):
    """--dtype fp16: UNet and text encoder fp16, the VAE kept fp32 (force_upcast); --verify passed (2/255
    against the live fp16 pipeline, its latents decoded by the same fp32 VAE)."""
    import onnx

    folder = tmp_path / "fp16"
    ok(invoke("bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--out", folder, "--dtype",
              "fp16"))
    record = json.loads((folder / "crdiff.json").read_text())
    assert {c: v["dtype"] for c, v in record["components"].items()} == {
        "unet": "float16", "text_encoder": "float16", "vae_decoder": "float32", "vae_encoder": "float32"}
    graph = onnx.load(str(folder / "text_encoder" / "model.onnx")).graph
    assert {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer if len(t.dims) == 2} == {"FLOAT16"}


def test_triton_casts_to_what_the_graphs_declare(tmp_path):
    """An fp16 repository: the Python model casts each input to the type its config.pbtxt declares (the fp16
    UNet's sample is fp16, its timestep stays fp32; input ids int32)."""
    grpc = pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format

    from crdiff_cli.deploy.sessions import cast_inputs
    from crdiff_cli.deploy.triton import MARKER

    repo = tmp_path / "repo"
    ok(invoke("bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--out", tmp_path / "f",
              "--dtype", "fp16", "--triton", repo, "--no-verify"))
    record = json.loads((repo / MARKER).read_text())
    numpy_types = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT32": np.int32}
    feeds = {"crdiff_unet": {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.array([5.0], np.float32),
                             "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)},
             "crdiff_text_encoder": {"input_ids": np.zeros((1, 77), np.int32)},
             "crdiff_vae_decoder": {"latent_sample": np.zeros((1, 4, 8, 8), np.float32)}}
    for model, inputs in feeds.items():
        config = text_format.Parse((repo / model / "config.pbtxt").read_text(), grpc.model_config_pb2.ModelConfig())
        declared = {t.name: numpy_types[grpc.model_config_pb2.DataType.Name(t.data_type)] for t in config.input}
        cast = cast_inputs(record["input_types"][model], inputs)
        assert {name: a.dtype.type for name, a in cast.items()} == declared
    assert declared == {"latent_sample": np.float32}
    assert set(record["files"]) == {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}


def test_triton_refusals(folders, tmp_path):
    """Refused before the model loads: the scalar timestep with --triton, overlapping folders; and --overwrite
    never replaces a repository holding a file crdiff did not write."""
    base = ["bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--no-verify"]
    result = invoke(*base, "--out", tmp_path / "a", "--triton", tmp_path / "t", "--tensorrt-conventions")
    assert result.exit_code == 2 and "drop --tensorrt-conventions or --triton" in result.stderr
    result = invoke(*base, "--out", tmp_path / "b", "--triton", tmp_path / "b" / "triton")
    assert result.exit_code == 2 and "overlap" in result.stderr and not (tmp_path / "b").exists()
    ok(invoke(*base, "--out", tmp_path / "c", "--triton", tmp_path / "t"))
    (tmp_path / "t" / "crdiff_unet" / "2").mkdir()
    (tmp_path / "t" / "crdiff_unet" / "2" / "mine.onnx").write_text("a user's model")
    result = invoke(*base, "--out", tmp_path / "d", "--triton", tmp_path / "t", "--overwrite")
    assert result.exit_code == 2 and "not a Triton model repository written by crdiff" in result.stderr
    assert (tmp_path / "t" / "crdiff_unet" / "2" / "mine.onnx").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("damage", ["resolution", "resolution_range", "base_model", "k", "files"])
def test_damaged_record_refused(copy_of, tmp_path, damage):
    folder = copy_of()
    record = json.loads((folder / "crdiff.json").read_text())
    if damage == "k":
        record["k"] = "abc"
    elif damage == "files":
        record["files"]["../outside.txt"] = "0" * 64
    else:
        del record[damage]
    (folder / "crdiff.json").write_text(json.dumps(record))
    _refused(_generate(folder, tmp_path / "out"), "crdiff.json is damaged", tmp_path / "out")


def test_tensorrt_conventions_keep_the_weights_digest(tmp_path):
    from crdiff_cli.exporters.onnx_artifact import check_weights

    folder = tmp_path / "trt"
    ok(invoke("bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--out", folder,
              "--tensorrt-conventions", "--no-verify"))
    assert check_weights(folder / "unet" / "model.onnx") is None


def test_base_scheduler_without_numpy_twin(tiny_dirs, tmp_path):
    """A model whose scheduler has no numpy twin (UniPC) bakes and verifies (with Euler); the folder then asks for
    --scheduler in one line, and runs with one."""
    from diffusers import UniPCMultistepScheduler

    from crdiff_cli.pipelines.loading import load_model

    loaded = load_model("tiny")
    loaded.pipe.scheduler = UniPCMultistepScheduler.from_config(loaded.pipe.scheduler.config)
    loaded.pipe.save_pretrained(tmp_path / "unipc-model")
    folder = tmp_path / "folder"
    ok(invoke("bake", "--model", tmp_path / "unipc-model", "--res", "64x64", "--format", "onnx-pipeline", "--out",
              folder, "--ratios", "0.4/0.3/0.2"))
    assert json.loads((folder / "crdiff.json").read_text())["layout"] == "sd"
    _refused(_generate(folder, tmp_path / "out"), "choose a scheduler name", tmp_path / "out")
    ok(_generate(folder, tmp_path / "out", "--scheduler", "euler"))


def test_tensorrt_provider_gets_an_engine_cache_per_model(crdiff_cache, folders, tmp_path):
    """ONNX Runtime's TensorRT provider builds engines per model and shape: crdiff caches them per model bytes
    (ONNX Runtime names engines by file name and graph, so two folders' unet/model.onnx must not share one)."""
    from crdiff_cli.deploy.sessions import with_settings

    providers = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert with_settings(["CPUExecutionProvider"], folders["tiny"] / "unet" / "model.onnx") == ["CPUExecutionProvider"]
    (trt, settings), cpu = with_settings(providers, folders["tiny"] / "unet" / "model.onnx")
    assert trt == "TensorrtExecutionProvider" and cpu == "CPUExecutionProvider" and settings["trt_engine_cache_enable"]
    engines = Path(settings["trt_engine_cache_path"])
    assert engines.parent == crdiff_cache / "tensorrt-engines" and engines.is_dir()
    other = with_settings(providers, folders["tiny-sdxl"] / "unet" / "model.onnx")[0][1]["trt_engine_cache_path"]
    again = with_settings(providers, folders["tiny"] / "unet" / "model.onnx")[0][1]["trt_engine_cache_path"]
    assert other != str(engines) and again == str(engines)


def test_sd2_style_folder(tmp_path):
    """An SD2.x-style model (pad token "!", a v-prediction DDIM scheduler): the folder keeps both, --verify
    passes, and the runner's image is the live one within 2/255 at a non-native size too."""
    from diffusers import DDIMScheduler

    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline
    from crdiff_cli.pipelines.loading import load_model

    loaded = load_model("tiny")
    loaded.pipe.scheduler = DDIMScheduler.from_config(loaded.pipe.scheduler.config, prediction_type="v_prediction",
                                                      timestep_spacing="trailing")
    loaded.pipe.tokenizer.pad_token = "!"
    loaded.pipe.save_pretrained(tmp_path / "sd2-style")
    folder = tmp_path / "folder"
    ok(invoke("bake", "--model", tmp_path / "sd2-style", "--res", "64x64", "--format", "onnx-pipeline", "--out",
              folder, "--ratios", "0.4/0.3/0.2", "--k", "1.3"))
    assert json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    runner = OnnxCrdiffPipeline.from_folder(folder, provider="cpu")
    assert runner.tokenizers["text_encoder"](["a"])[0, -1] == loaded.pipe.tokenizer.convert_tokens_to_ids("!")
    ours = runner(PROMPT, seeds=2, steps=3, height=48, width=80)[0]
    live = live_image(load_model(str(tmp_path / "sd2-style")), folder, 48, 80, seed=2, steps=3)
    assert np.abs(pixels(ours) - pixels(live)).max() <= 2


class PassCounter:
    """The runner's UNet, counting the passes it asks the policy graph for (poa_pass 0 runs two)."""

    def __init__(self, unet):
        self.unet, self.passes = unet, 0

    def keep(self, **arrays):
        return self.unet.keep(**arrays)

    def __call__(self, kept, **feeds):
        self.passes += 2 if int(feeds["poa_pass"][0]) == 0 else 1
        return self.unet(kept, **feeds)


@pytest.mark.parametrize("scheduler", [None, "euler"])
def test_poa_policy_folder_equals_live_policy(tmp_path_factory, load_tiny, scheduler):
    """A folder baked with a POA policy (window and refresh): the runner runs exactly the policy's UNet passes,
    and its image is the live pipeline's under the same policy within 2/255; generate --poa-* overrides the baked
    policy; the TensorRT demo's conventions (no poa_pass input) are refused for it."""
    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline
    from crdiff_cli.dual.apply import apply_crdiff
    from crdiff_cli.dual.poa_policy import PoaPolicy
    from crdiff_cli.pipelines.schedulers import set_scheduler
    from crdiff_cli.pruning.ratios import Ratios

    root = tmp_path_factory.mktemp("poa")
    policy = PoaPolicy.parse("0:0.6", "pruned", 2)
    flags = ["--poa-interval", "0:0.6", "--poa-outside", "pruned", "--poa-refresh", "2"]
    folder = bake_folder(root, "tiny", "64x64", *flags)
    record = json.loads((folder / "crdiff.json").read_text())
    assert record["poa_switch"] and PoaPolicy.from_dict(record["poa"]) == policy
    runner = OnnxCrdiffPipeline.from_folder(folder, provider="cpu")
    unet = runner.models["unet"] = PassCounter(runner.models["unet"])
    ours = runner(PROMPT, seeds=4, steps=7, scheduler=scheduler)[0]
    loaded = load_tiny("tiny")
    set_scheduler(loaded.pipe, scheduler)
    apply_crdiff(loaded.pipe, Ratios.parse("0.4/0.3/0.2"), k=1.3, poa=policy)
    live = generate_image(loaded.pipe, PROMPT, 4, GenerationSettings(Resolution(64, 64), 7))
    assert np.abs(pixels(ours) - pixels(live)).max() <= 2
    assert unet.passes == loaded.pipe.unet.passes < 2 * len(loaded.pipe.scheduler.timesteps)
    full = runner(PROMPT, seeds=4, steps=7, scheduler=scheduler, poa=PoaPolicy())[0]
    assert not np.array_equal(pixels(full), pixels(ours))
    if scheduler is None:
        result = invoke("bake", "--model", "tiny", "--res", "64x64", "--format", "onnx-pipeline", "--out",
                        root / "trt", *flags, "--tensorrt-conventions")
        assert result.exit_code == 2 and "no poa_pass input" in result.stderr and not (root / "trt").exists()
        out = root / "out"
        ok(_generate(folder, out, "--poa-interval", "0:1", "--poa-refresh", "1", "--seed", "4", "--steps", "7"))
        assert np.array_equal(pixels(_open(out / "0_4.png")), pixels(full))


def test_policy_runs_one_pass_where_the_result_is_one_pass(tmp_path):
    """As the live dual UNet: at k = 1 a both-passes step runs only the pruned pass (k = 0: the dense one), and
    with nothing pruned every step runs the dense pass alone."""
    from crdiff_cli.deploy.poa_steps import PolicySteps
    from crdiff_cli.dual.poa_policy import PoaPolicy

    policy = PoaPolicy.parse("0:1", "dense", 2)
    timesteps = np.array([900, 700, 500, 300, 100])
    for k, pruned, expected in ((1.0, True, "pruned"), (0.0, True, "dense"), (1.3, False, "dense")):
        steps = PolicySteps(policy, k, timesteps, pruned)
        assert [steps.plan(t) for t in timesteps] == [expected] * 5
    steps = PolicySteps(policy, 1.3, timesteps)
    assert [steps.plan(t) for t in timesteps[:1]] == ["both"]
