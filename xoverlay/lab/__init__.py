"""The labs: a cluster on this machine, its nodes network namespaces (namespace_lab) or
qemu VMs with a kernel of their own (vm_lab), the underlay a switch, the demo network,
service and outside client."""
