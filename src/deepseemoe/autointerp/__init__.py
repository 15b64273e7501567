"""Feature explanations and their scoring."""
