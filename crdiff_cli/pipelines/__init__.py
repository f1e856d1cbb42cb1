"""Diffusers pipelines around the dual UNet: loading models (hub ids, folders, single files, the
embedded tiny models), LoRAs, ControlNet / img2img / inpainting, schedulers, generating images and writing
them (PNG with parameters, manifests, pruned-model folders), and the one preparation path every command uses."""
