"""The evaluation protocol (dense, pruned and CR-Diff images of the same prompts and seeds): metrics,
FID, bootstrap statistics and paired tests, result files and the HTML report."""
