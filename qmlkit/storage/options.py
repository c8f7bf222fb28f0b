"""Storage options as pydantic models: each backend declares what it accepts.

``ServerConfig.storage_options`` (or ``App(storage_options=...)``) reaches a backend's
``from_url`` as a plain mapping; the backend parses it with its `StorageOptions`
subclass, which forbids unknown keys (``extra="forbid"``) and checks types strictly.
Every refusal is a ``ConfigurationError`` that names the key. Range checks that also
apply to direct construction stay in the backend's constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from qmlkit.errors import ConfigurationError

__all__ = ["StorageOptions"]

_O = TypeVar("_O", bound="StorageOptions")


class StorageOptions(BaseModel):
    """Base of every backend's options model.

    Subclasses set `backend` (for messages, e.g. ``"Redis storage"``) and declare one
    field per keyword argument of the backend's constructor, with the same default (a
    keyword that pydantic reserves, such as ``schema``, is a field with that alias).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: How messages name the backend, e.g. ``"SQL storage"``.
    backend: ClassVar[str] = "storage"

    @classmethod
    def parse(cls: type[_O], options: Mapping[str, Any]) -> _O:
        """Check ``options`` against the model.

        Raises:
            ConfigurationError: An unknown key (``"<backend>: unknown option(s) [...];
                known: [...]"``) or a value of the wrong type (naming key and value).
        """
        known = sorted(f.alias or name for name, f in cls.model_fields.items())
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigurationError(
                f"{cls.backend}: unknown option(s) {unknown}; known: {known}")
        try:
            return cls.model_validate(dict(options))
        except ValidationError as exc:
            error = exc.errors()[0]
            key = str(error["loc"][0]) if error["loc"] else "?"
            raise ConfigurationError(
                f"{cls.backend} option {key}={options.get(key)!r}: {error['msg']}"
            ) from None

    def given(self) -> dict[str, Any]:
        """The options the caller set, as constructor keyword arguments (defaults left
        to the constructor)."""
        fields = type(self).model_fields
        return {fields[name].alias or name: getattr(self, name) for name in self.model_fields_set}
