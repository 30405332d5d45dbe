"""samrobust's tests (a regular package: an installed `tests` package, such as robustbench's,
must not shadow it)."""
