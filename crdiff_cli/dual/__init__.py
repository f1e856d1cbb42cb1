"""The live dual UNet: a dense UNet and its pruned twin sharing every weight, combined by pruned output
amplification (POA), and the one call that applies it to a diffusers pipeline (``apply_crdiff``)."""
