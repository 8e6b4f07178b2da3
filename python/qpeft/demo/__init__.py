"""qpeft demo: see qpeft.demo.main."""
