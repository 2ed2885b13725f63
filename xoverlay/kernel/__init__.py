"""What touches the kernel: libbpf calls, pinned maps, programs, veths, the gateway, netns, processes."""
