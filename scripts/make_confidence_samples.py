#!/usr/bin/env python3
"""Writes the bundled MedQA- and BoolQ-format samples of pipelines/confidence.yaml
(examples/data/confidence/): short questions written for this project, in the two
datasets' own record layouts (MedQA: question, options A-E, answer text, answer_idx,
meta_info; BoolQ: question, passage, answer, title), split into train and val.

    python3 scripts/make_confidence_samples.py
"""
import json
import pathlib

# (question, [options A..E], index of the right one)
MEDQA = [
    ("Deficiency of which vitamin causes scurvy?", ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K", "Vitamin B12"], 1),
    ("Which organ produces insulin?", ["Liver", "Kidney", "Pancreas", "Spleen", "Thyroid"], 2),
    ("Which blood cells carry oxygen?", ["Red blood cells", "Neutrophils", "Platelets", "Lymphocytes", "Monocytes"], 0),
    ("Which vitamin deficiency causes rickets in children?", ["Vitamin C", "Vitamin B1", "Vitamin D", "Vitamin E", "Folate"], 2),
    ("Which drug class does amoxicillin belong to?", ["Macrolides", "Penicillins", "Statins", "Beta blockers", "Opioids"], 1),
    ("Which gland secretes thyroxine?", ["Adrenal gland", "Pituitary gland", "Thyroid gland", "Pineal gland", "Thymus"], 2),
    ("Which bone is the longest in the human body?", ["Humerus", "Tibia", "Femur", "Radius", "Fibula"], 2),
    ("Which chamber of the heart pumps blood into the aorta?", ["Right atrium", "Right ventricle", "Left atrium", "Left ventricle", "Sinus node"], 3),
    ("Which mineral is needed to make hemoglobin?", ["Iron", "Calcium", "Sodium", "Zinc", "Iodine"], 0),
    ("Deficiency of iodine most often causes which condition?", ["Goiter", "Anemia", "Scurvy", "Gout", "Asthma"], 0),
    ("Which organism causes tuberculosis?", ["Staphylococcus aureus", "Mycobacterium tuberculosis", "Escherichia coli", "Candida albicans", "Influenza virus"], 1),
    ("Which drug reverses an opioid overdose?", ["Naloxone", "Atropine", "Adrenaline", "Insulin", "Heparin"], 0),
    ("Which part of the brain controls balance and coordination?", ["Cerebrum", "Cerebellum", "Hypothalamus", "Thalamus", "Amygdala"], 1),
    ("Which organ filters blood to make urine?", ["Liver", "Bladder", "Kidney", "Lung", "Stomach"], 2),
    ("Which hormone lowers blood glucose?", ["Glucagon", "Cortisol", "Insulin", "Adrenaline", "Thyroxine"], 2),
    ("Which vessel carries blood from the heart to the lungs?", ["Aorta", "Pulmonary artery", "Vena cava", "Pulmonary vein", "Carotid artery"], 1),
    ("Which vitamin is needed for blood clotting?", ["Vitamin K", "Vitamin C", "Vitamin A", "Vitamin B6", "Vitamin D"], 0),
    ("Which virus causes chickenpox?", ["Measles virus", "Varicella zoster virus", "Rabies virus", "Rotavirus", "Hepatitis B virus"], 1),
    ("Which test measures average blood glucose over about three months?", ["Troponin", "HbA1c", "Creatinine", "TSH", "Ferritin"], 1),
    ("Which organ stores bile?", ["Gallbladder", "Pancreas", "Spleen", "Appendix", "Duodenum"], 0),
    ("Which joint is the knee?", ["Ball and socket", "Hinge", "Pivot", "Saddle", "Gliding"], 1),
    ("Which cells make antibodies?", ["Red blood cells", "Platelets", "Plasma cells", "Neurons", "Osteoclasts"], 2),
    ("Which drug is a common first choice for type 2 diabetes?", ["Metformin", "Warfarin", "Morphine", "Prednisone", "Furosemide"], 0),
    ("Which electrolyte disorder causes peaked T waves on an ECG?", ["Hyponatremia", "Hyperkalemia", "Hypocalcemia", "Hypomagnesemia", "Hypokalemia"], 1),
    ("Which structure connects muscle to bone?", ["Ligament", "Tendon", "Cartilage", "Fascia", "Bursa"], 1),
    ("Which infection does the BCG vaccine protect against?", ["Polio", "Tuberculosis", "Measles", "Tetanus", "Malaria"], 1),
    ("Which parasite causes malaria?", ["Plasmodium", "Giardia", "Toxoplasma", "Trichomonas", "Ascaris"], 0),
    ("Which nerve is compressed in carpal tunnel syndrome?", ["Ulnar nerve", "Radial nerve", "Median nerve", "Sciatic nerve", "Facial nerve"], 2),
    ("Which organ is mainly affected by hepatitis?", ["Heart", "Liver", "Kidney", "Lung", "Brain"], 1),
    ("Which lab value rises in a heart attack?", ["Troponin", "Amylase", "Bilirubin", "Albumin", "Lipase"], 0),
    ("Which vitamin deficiency causes night blindness?", ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K", "Niacin"], 0),
    ("Which organ produces bile?", ["Gallbladder", "Liver", "Pancreas", "Stomach", "Colon"], 1),
]

# (title, passage, question, answer)
BOOLQ = [
    ("Water", "Water boils at 100 degrees Celsius at sea level.", "does water boil at 100 degrees celsius at sea level", True),
    ("Moon", "The Moon orbits the Earth about once every 27 days.", "does the moon orbit the sun once a day", False),
    ("Penguins", "Penguins are flightless birds that live mostly in the Southern Hemisphere.", "can penguins fly", False),
    ("Spiders", "Spiders have eight legs and are arachnids, not insects.", "are spiders insects", False),
    ("Bats", "Bats are mammals and the only mammals capable of sustained flight.", "are bats mammals", True),
    ("Tomato", "Botanically, the tomato is a fruit because it develops from the flower's ovary.", "is a tomato a fruit in botany", True),
    ("Sahara", "The Sahara is a hot desert covering much of North Africa.", "is the sahara in south america", False),
    ("Venus", "Venus is the second planet from the Sun and the hottest planet in the solar system.", "is venus the hottest planet", True),
    ("Whales", "Whales breathe air through blowholes and must surface to breathe.", "can whales breathe underwater", False),
    ("Gold", "Gold is a chemical element with the symbol Au.", "is the chemical symbol for gold au", True),
    ("Mount Everest", "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.", "is mount everest in nepal", True),
    ("Tea", "Green tea and black tea both come from the leaves of the Camellia sinensis plant.", "do green and black tea come from different plants", False),
    ("Octopus", "An octopus has three hearts and blue blood.", "does an octopus have three hearts", True),
    ("Glass", "Glass is an amorphous solid; it does not flow noticeably at room temperature.", "does glass flow like a liquid at room temperature", False),
    ("Lightning", "Lightning can strike the same place more than once, and tall buildings are struck many times a year.", "can lightning strike the same place twice", True),
    ("Diamonds", "Diamonds are made of carbon atoms arranged in a crystal lattice.", "are diamonds made of carbon", True),
    ("Camels", "Camels store fat, not water, in their humps.", "do camels store water in their humps", False),
    ("Sound", "Sound needs a medium such as air or water to travel and cannot cross a vacuum.", "can sound travel through a vacuum", False),
    ("Pluto", "In 2006 Pluto was reclassified as a dwarf planet.", "is pluto classified as a dwarf planet", True),
    ("Goldfish", "Goldfish can remember things for months, far longer than a few seconds.", "do goldfish forget everything after three seconds", False),
    ("Great Wall", "The Great Wall of China is not visible to the naked eye from the Moon.", "can you see the great wall of china from the moon", False),
    ("Honey", "Honey stored in sealed containers can last for thousands of years without spoiling.", "can honey last for thousands of years", True),
    ("Bananas", "Bananas grow on large herbaceous plants, not on true trees.", "do bananas grow on trees", False),
    ("Mercury", "Mercury is the planet closest to the Sun.", "is mercury the closest planet to the sun", True),
    ("Sharks", "Sharks are fish; they have a skeleton made of cartilage.", "are sharks mammals", False),
    ("Iceland", "Iceland is an island country in the North Atlantic Ocean.", "is iceland an island", True),
    ("Ostrich", "The ostrich is the largest living bird and cannot fly.", "can an ostrich fly", False),
    ("Rainbows", "A rainbow forms when sunlight is refracted and reflected in water droplets.", "do rainbows need water droplets", True),
    ("Bamboo", "Bamboo is a grass, and some species grow almost a meter in a day.", "is bamboo a kind of grass", True),
    ("Antarctica", "Antarctica is the coldest continent and has no permanent human population.", "does antarctica have a large permanent population", False),
    ("Koalas", "Koalas eat almost only eucalyptus leaves.", "do koalas mostly eat eucalyptus leaves", True),
    ("Neptune", "Neptune is the farthest known planet from the Sun.", "is neptune closer to the sun than earth", False),
]


def main():
    out = pathlib.Path(__file__).resolve().parents[1] / "examples/data/confidence"
    out.mkdir(parents=True, exist_ok=True)
    letters = "ABCDE"
    med = []
    for q, opts, right in MEDQA:
        med.append({"question": q, "options": dict(zip(letters, opts)), "answer": opts[right],
                    "answer_idx": letters[right], "meta_info": "step1"})
    boolq = [{"question": q, "passage": p, "answer": a, "title": t} for t, p, q, a in BOOLQ]
    for name, rows in [("medqa", med), ("boolq", boolq)]:
        cut = len(rows) * 5 // 8
        for part, sub in [("train", rows[:cut]), ("val", rows[cut:])]:
            path = out / f"{name}_{part}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in sub))
            print(f"{len(sub)} -> {path}")


if __name__ == "__main__":
    main()
