"""The extraction schema and people of the structured-output tests (also used by scripts/structured_bench.py)."""

# Nested objects, an enum, a bounded integer, an array of strings, required fields.
SCHEMA = {
    "type": "object",
    "properties": {
        "person": {"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 60},
                                  "age": {"type": "integer", "minimum": 0, "maximum": 130}},
                   "required": ["name", "age"], "additionalProperties": False},
        "city": {"type": "string", "maxLength": 60},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "topics": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 5},
    },
    "required": ["person", "city", "sentiment", "topics"],
    "additionalProperties": False,
}
PEOPLE = [("Alice Martin", 34, "Lyon", "She loves painting and cycling"),
          ("Bob Chen", 52, "Toronto", "He complained about traffic and taxes"),
          ("Carla Diaz", 28, "Madrid", "She started a bakery and is thrilled"),
          ("David Okoye", 41, "Lagos", "He teaches physics and plays chess"),
          ("Emma Schultz", 67, "Berlin", "She retired from nursing and gardens daily"),
          ("Farid Haddad", 23, "Beirut", "He is a student of architecture"),
          ("Grace Lee", 45, "Seoul", "She runs a tech startup that is struggling"),
          ("Hugo Rossi", 39, "Milan", "He designs shoes and travels often"),
          ("Ines Costa", 31, "Lisbon", "She surfs and writes poetry"),
          ("Jack Brown", 58, "Denver", "He fixes old cars and hates the cold"),
          ("Kenji Sato", 36, "Osaka", "He cooks ramen and loves baseball"),
          ("Lena Novak", 29, "Prague", "She studies music and sings in a choir"),
          ("Marco Silva", 47, "Rio", "He is a fisherman worried about storms"),
          ("Nadia Ivanova", 33, "Kyiv", "She is a doctor who volunteers"),
          ("Omar Farouk", 61, "Cairo", "He sells spices and enjoys history"),
          ("Priya Nair", 26, "Mumbai", "She codes apps and dances"),
          ("Quinn Walsh", 44, "Dublin", "He writes novels and drinks tea"),
          ("Rosa Mendes", 55, "Porto", "She teaches kids and is happy"),
          ("Sam Taylor", 38, "Sydney", "He surfs and fixes boats"),
          ("Tara Singh", 30, "Delhi", "She paints murals and is proud of her work")]
