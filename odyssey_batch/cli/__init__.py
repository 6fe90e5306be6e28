"""The ``odyssey-batch`` command line."""
