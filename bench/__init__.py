"""The benchmarks (the scripts here) and what they share (bench/lib/). A package so that
`bench.lib` is found in this tree first, never a same-named module elsewhere."""
