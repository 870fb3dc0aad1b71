"""The simulated world's parts, for `world.py` (which see): standard library only, like world.py itself.

world.py imports this package as `nsfw.worldlib` when it is imported as `nsfw.world`, and by its path when it
is run as a script or loaded from a file (World's world-readable copy, for probes in sandboxes, holds both).
So these modules import each other relatively, and nothing outside this directory.

  layout    the map: namespaces, addresses, ports, paths, the default zone, probe exit codes
  dnswire   DNS wire format: names, questions, type names
  zone      the world's DNS: zones, their resolution, the answer to a query
  servers   banner/echo TCP and UDP servers, and DNS, on every address of a namespace
  host      the world process: builds the simulated host, runs the servers, takes snapshots
  probes    the probe, as run inside sandboxes
"""
