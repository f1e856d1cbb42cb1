"""Output safety: outputs checked before any work, staged under marked names and renamed whole;
append-only journals that make long runs resumable; cached file digests."""
