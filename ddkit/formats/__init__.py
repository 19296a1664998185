"""On-disk artifacts: save, load and validate. Nothing else in ddkit reads or writes them directly."""
