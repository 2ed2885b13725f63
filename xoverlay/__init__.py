"""xoverlay: a container overlay network (VXLAN) with its data path in eBPF.

The layers, lowest first; a module imports only from its own layer and those above it in
this list (tests/test_package_layout.py checks it):
  errors   the one exception a user sees as a line (and its kinds)
  maps/    the contract with the C side: every map's layout, the drop reasons, the event types
  core/    the rules, no I/O: the model and IPAM, the desired maps and their diff, Maglev, DNS answers
  kernel/  what touches the kernel: libbpf calls, pinned maps and counters, loading and attaching,
           endpoints' veths, the node's gateway and egress, netns, processes
  store/   where the cluster state lives: the interface, SQLite, etcd, and running an etcd server
  runtimes/ container runtimes that attach their own containers: Docker's network and IPAM plugin
  agent/   the per-node agent: up and down, the reconcile loop, repair, the DNS responder, metrics
  lab/     the namespace lab (with a dockerd per node: --docker), the VM lab, and the demo server
  ui/      what a person sees: the CLI, status and its TUI, monitor, lints, service views
"""
