"""External runtimes quantbench checks its files in (built or found, never a dependency)."""
