"""Routing interventions (expert ablation/exclusion, forced and random routing) and feature edits."""
