"""Features mapped to experts: co-firing statistics, router-logit attribution, routing prediction."""
