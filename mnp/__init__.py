"""mnp: AWS Batch's job model (single, array and multi-node parallel jobs) on
any set of machines reachable over SSH, or on this machine alone."""

__version__ = "0.1.0"
