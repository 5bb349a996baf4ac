"""The registry of localization methods (baseline, GREN and its ablations, the peers)."""
