"""The process around the work: ``torch.distributed`` ranks under torchrun and glibc malloc settings."""
