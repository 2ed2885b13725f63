"""maps: the contract between the BPF data path and the control plane."""
