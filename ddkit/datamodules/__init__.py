"""LightningDataModules: real datasets, distilled sets, expert segments, recovery jobs."""
