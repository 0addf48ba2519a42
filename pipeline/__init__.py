"""Linux Distro Tools: Dockerfile → bootable VM images through one content-hash build graph."""
