"""Pure tensor math: no module state, each function checked against float64 references."""
