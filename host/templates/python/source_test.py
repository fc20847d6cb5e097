"""Run from this folder: python -m unittest -v"""

import pathlib
import unittest

import logic


class ParseBody(unittest.TestCase):
    def test_the_example_payload_is_one_qualified_deal(self):
        event = logic.parse_body(pathlib.Path(__file__).with_name("example-payload.json").read_bytes())
        self.assertEqual((event["reference"], event["status"]), ("D-1001", "Qualified"))
        self.assertEqual(event["customer"]["email"], "jane.doe@example.com")
        self.assertEqual(event["deal"]["value"], 250000.0)

    def test_problems_name_their_field(self):
        with self.assertRaises(logic.Problem) as missing:
            logic.parse_body(b'{"deal": {"status": "Won"}}')
        self.assertEqual((missing.exception.kind, missing.exception.field), ("missing", "deal.id"))
        with self.assertRaises(logic.Problem) as wrong:
            logic.parse_body(b'{"deal": {"id": "D", "status": "Won", "value": "lots"}}')
        self.assertEqual((wrong.exception.kind, wrong.exception.field), ("invalid", "deal.value"))
        with self.assertRaises(logic.Problem):
            logic.parse_body(b"not json")


if __name__ == "__main__":
    unittest.main()
