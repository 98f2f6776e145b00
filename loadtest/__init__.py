"""Load tests and benchmarks."""

if not __name__.startswith("playbus."):
    raise ImportError(f"import playbus.{__name__}, not {__name__}: this folder is a subpackage of playbus")

