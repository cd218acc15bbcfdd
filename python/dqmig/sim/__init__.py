"""The virtual-time engine: the same policies and pre-copy loop on a modelled guest and link.

`guest.SimVM` implements engine.Host (modelled vCPUs, memory as counts per region, exits as
events in virtual time), `migration.SimMigration` the pre-copy loop's engine side over a
modelled link, and `run` one scenario under one policy with the emulator's result schema.
"""
