"""The ground floor: errors and exit codes, the noise streams, ensemble statistics, the chunk step loop
(`steps`), what the host offers (`host`) and progress bars. Imports: numpy, rich; nothing else of this package.
"""
