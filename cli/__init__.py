"""The `musiq` command line: one entry point, subcommands implemented by the packages that own them."""
