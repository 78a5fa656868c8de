"""Let small helper objects live across the DSL's dynamic `for` / `if`.

The CuTe DSL rebuilds every local that a run-time loop or branch touches from its MLIR values.
A helper lists its DSL-valued attributes in `_dsl_fields`; everything else on it is static.
"""

import copy

import cutlass


class DslCarried:
    _dsl_fields: tuple = ()

    def __extract_mlir_values__(self):
        values, self._dsl_sizes = [], []
        for name in self._dsl_fields:
            field_values = cutlass.extract_mlir_values(getattr(self, name))
            values += field_values
            self._dsl_sizes.append(len(field_values))
        return values

    def __new_from_mlir_values__(self, values):
        rebuilt = copy.copy(self)
        start = 0
        for name, size in zip(self._dsl_fields, self._dsl_sizes, strict=True):
            field = cutlass.new_from_mlir_values(getattr(self, name), values[start : start + size])
            setattr(rebuilt, name, field)
            start += size
        return rebuilt
