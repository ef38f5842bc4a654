"""Files on disk: NIfTI reading and writing, atomic writes, the per-case output lock and the unfinished work of
a run. Imports: numpy, nibabel; `core`.
"""
