"""The static report and its figures."""
