"""The application layer: the command line (``cli``), its ready-made jobs (``jobs``, ``measure``, ``train``) and
the seaborn figures of run outputs (``plot``). It imports the library core; the core never imports it."""
