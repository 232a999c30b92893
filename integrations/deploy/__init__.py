"""The deploy core, engine-independent: DeviceBuild (build.py: export, build or cache hit, sessions), the raw-map
graph export (graph.py), safe checkpoint loading (checkpoint.py), the config's pipeline outside the loop
(pipeline.py) and int8's float-layer search (int8_search.py)."""
