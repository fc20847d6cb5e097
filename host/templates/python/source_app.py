"""__NAME__: turns one webhook into the deal event it carries.

The logic is `logic.py`, plain Python tested with `python -m unittest`; this
module converts its result into the contract's types (the `wit_world`
package that componentize-py generates at build time).
"""

import wit_world
from wit_world.imports import types
from componentize_py_types import Err

import logic


class WitWorld(wit_world.WitWorld):
    def parse(self, request):
        try:
            e = logic.parse_body(bytes(request.body))
        except logic.Problem as p:
            # A `result` export returns its `err` case by raising Err(value).
            raise Err(_error(p))
        c, d = e["customer"], e["deal"]
        return [
            types.CrmEvent(
                event_type=e["event_type"],
                reference=e["reference"],
                status=e["status"],
                customer=types.Customer(
                    contact_id=None, first_name=c["first_name"], last_name=c["last_name"], email=c["email"],
                    phone=c["phone"], city=None, state=None, zip_code=None, country=None,
                ),
                deal=types.Deal(name=d["name"], value=d["value"], currency=d["currency"], closing_date=None),
                property=None,
                occurred_at=None,
                lead_id=None,
                received_at=0,  # set by the host
            )
        ]


def _error(p):
    if p.kind == "malformed":
        return types.ParseError_Malformed(p.message)
    if p.kind == "missing":
        return types.ParseError_MissingField(p.field)
    return types.ParseError_InvalidField(types.FieldError(field=p.field, expected=p.message))
