"""Routing statistics over the routing store (DuckDB over parquet) and their figures."""
