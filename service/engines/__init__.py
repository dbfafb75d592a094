"""One module per engine. Importing this package imports no engine library."""
