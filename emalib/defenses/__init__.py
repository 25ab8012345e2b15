"""In-training defenses (docs/methods.md#defenses): one module per defense, each implementing the optional hooks of
`emalib.defenses.base.DefenseBase`; `emalib.defenses.registry` maps registry names to them. Config blocks are in
`emalib.core.defense_specs` (importing this package loads no torch)."""
