"""Prices: USD per million input and output tokens per provider and model, from prices.toml."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from domain.costs.ledger import MILLION, as_money
from domain.errors import ConfigurationError, InvalidInput


# -- prices -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prices:
    """USD per million input/output tokens per (provider, model), from prices.toml:

    [openai."gpt-4o-mini"]
    input_per_million = "0.15"
    output_per_million = "0.60"
    """

    table: dict[tuple[str, str], tuple[Decimal, Decimal]]

    @classmethod
    def load(cls, path: Path | None) -> Prices:
        if path is None or not path.exists():
            return cls({})
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
        table: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
        for provider, models in raw.items():
            for model, entry in models.items():
                where = f"{path}: [{provider}.{model}]"
                currency = str(entry.get("currency", "USD"))
                if currency.upper() != "USD":
                    raise ConfigurationError(f"{where}: currency {currency!r}; prices are in USD")
                try:
                    table[(provider, model)] = (
                        as_money(entry["input_per_million"], field="input_per_million"),
                        as_money(entry["output_per_million"], field="output_per_million"),
                    )
                except KeyError as missing:
                    raise ConfigurationError(f"{where}: missing {missing}") from None
                except InvalidInput as exc:
                    raise ConfigurationError(f"{where}: {exc}") from None
        return cls(table)

    def cost(self, provider: str, model: str, tokens_in: int, tokens_out: int) -> Decimal | None:
        price = self.table.get((provider, model))
        if price is None:
            return None
        return (price[0] * tokens_in + price[1] * tokens_out) / MILLION
