"""The lineage pure logic: planning against the record, the version record, the report, the sweep, preflight."""
