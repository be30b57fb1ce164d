"""MONAI Label adapters: infer tasks and server glue. Thin: they call the library."""
