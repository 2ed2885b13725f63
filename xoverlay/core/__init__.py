"""The rules, with no I/O: state and IPAM, desired maps and the diff, Maglev, DNS, rates."""
