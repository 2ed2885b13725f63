"""Container runtimes that attach their containers themselves: Docker's network and IPAM
plugin (docker_plugin), served by the node's agent."""
