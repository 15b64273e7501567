"""What happens when parts are taken away: causal checks of routing, removal of one behaviour, and
feature steering."""
