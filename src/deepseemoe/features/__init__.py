"""Features ↔ experts: what a dictionary's features say about routing (the map) and the graph of
features and experts they form."""
