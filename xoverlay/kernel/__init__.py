"""What touches the kernel: libbpf calls, pinned maps, programs, veths, netns, teardown."""
