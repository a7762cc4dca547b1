"""hub test suite."""
