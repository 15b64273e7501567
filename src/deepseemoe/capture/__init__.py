"""Hook management: one forward feeding many consumers; activation and routing stores."""
