"""What the benchmarks share, by job:

  venv             re-run a script under the project's venv (imports nothing it lacks)
  shell            names of what a benchmark creates, where commands run (this machine;
                   a VM lab's guest is in vm_paths), commands and namespaces, the lock,
                   signals and clean-up, the machine and /proc
  topologies       the east-west paths: plain routing, kernel vxlan, the xoverlay lab
  vm_paths         the same paths between two VMs of the VM lab (bench/eastwest --vms)
  service_paths    the same with services: kube-proxy-style nftables, an xoverlay lab with N
  kube_proxy       the nftables ruleset laid out as kube-proxy's iptables mode
  traffic          the servers and the traffic tools (iperf3, sockperf, the interleaved
                   packet and connection rates of bench/pairrate.py and bench/connrate.py)
  stats            summaries, the interleaved ratio, results files
  prog_cost        per-packet cost of the BPF programs, on the tests' harness (tests/bpfrun.py)
  runner           what bench/eastwest and bench/services share: options, rounds, the run's
                   life cycle, bars, results file, report and chart

Everything a benchmark creates is named so that it can be found and removed after a
crash, and never touches anything else (shell.PREFIX, shell.STATE_ROOT, shell.BPF_NODE)."""
