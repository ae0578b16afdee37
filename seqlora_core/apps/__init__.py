"""Applications of the library: the command line (:mod:`.cli`), the demo (:mod:`.demo`), the recipes
they and the benchmarks share (:mod:`.recipes`), the bases a command can name (:mod:`.bases`) and the
report's heatmap picture (:mod:`.heatmap`). The top layer: it may use every other one.
"""
