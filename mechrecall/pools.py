"""Value pools for synthetic people, written for this project.

Sizes follow the structure of the bioS data (Allen-Zhu & Li, Physics of LMs 3.1) at a smaller scale: the lists
below are mechrecall's own (US cities, universities, fields of study) or composed from word lists (companies), so
no pool is copied from the reference generator. Company city is a fixed function of the company, chosen once with
a seeded generator, so it is not an independent attribute (its accuracy has a majority-class floor).
"""

from __future__ import annotations

import random
from functools import cache

FIRST_NAMES = """
Aaron Abigail Adrian Alice Amara Andre Anya Arjun Astrid Beatrix Bennett Bianca Caleb Camila Cedric Celeste Dante
Delia Dmitri Elena Elias Eloise Emeka Esme Ezra Fiona Flynn Freya Gideon Greta Hana Harvey Imani Ingrid Isaac Ivy
Jasper Jonah Juno Kai Keira Kenji Lara Leif Leona Lucian Mabel Malik Marisol Mateo Maya Milo Nadia Nico Nina Omar
Opal Orion Paloma Pavel Petra Quinn Rafael Ravi Rhea Rosalind Rowan Sabine Sami Selma Silas Soren Stella Tariq Thea
Tobias Uma Ulric Valentina Vera Viktor Wanda Wesley Willa Xavier Yara Yusuf Zara Zeke Zoya Bram Cora Dario Edith Faye
""".split()

LAST_NAMES = """
Abbott Achterberg Alcott Ambrose Ashdown Barlow Beaumont Blackwood Bramble Calloway Carrow Castellan Chen Cordova
Dalton Delacroix Draper Eastwood Ellery Falkner Fairweather Fenwick Forger Galloway Garrick Greaves Hadley Halloran
Hargrove Holloway Ibarra Iverson Jaffrey Jernigan Kaplan Kestrel Kingsley Lachance Langford Lindqvist Lockhart
Marlowe Mercado Merriweather Montague Nakamura Navarro Northcott Oakes Okafor Ortega Pemberton Petrov Prescott Quill
Radcliffe Ramsey Redgrave Rinaldi Rockwell Salazar Sandoval Sheridan Sinclair Sterling Tanaka Thornbury Trevino
Underhill Valdez Vance Varga Wakefield Whitlock Winslow Wexley Yamada Yarrow Zeller Zielinski Ashford Brennan Corwin
Devereux Ellison Fontaine Grimaldi Harlow Ingram Jansen Kowalski Lorimer Mallory Norwood Pryce Quintero Rosen Strand
""".split()

CITIES = [
    "Princeton, NJ", "Boise, ID", "Tucson, AZ", "Fresno, CA", "Spokane, WA", "Savannah, GA", "Madison, WI",
    "Ann Arbor, MI", "Durham, NC", "Reno, NV", "Tulsa, OK", "Omaha, NE", "Provo, UT", "Eugene, OR", "Akron, OH",
    "Dayton, OH", "Lansing, MI", "Syracuse, NY", "Albany, NY", "Buffalo, NY", "Rochester, MN", "Duluth, MN",
    "Fargo, ND", "Billings, MT", "Cheyenne, WY", "Laramie, WY", "Santa Fe, NM", "Las Cruces, NM", "El Paso, TX",
    "Lubbock, TX", "Waco, TX", "Amarillo, TX", "Galveston, TX", "Baton Rouge, LA", "Shreveport, LA", "Mobile, AL",
    "Huntsville, AL", "Jackson, MS", "Memphis, TN", "Knoxville, TN", "Chattanooga, TN", "Lexington, KY",
    "Louisville, KY", "Richmond, VA", "Norfolk, VA", "Roanoke, VA", "Charleston, SC", "Greenville, SC",
    "Asheville, NC", "Wilmington, DE", "Dover, DE", "Annapolis, MD", "Baltimore, MD", "Hartford, CT",
    "New Haven, CT", "Providence, RI", "Worcester, MA", "Springfield, IL", "Peoria, IL", "Champaign, IL",
    "Bloomington, IN", "Fort Wayne, IN", "Toledo, OH", "Erie, PA", "Scranton, PA", "Allentown, PA",
    "Pittsburgh, PA", "Burlington, VT", "Portland, ME", "Manchester, NH", "Concord, NH", "Tallahassee, FL",
    "Gainesville, FL", "Pensacola, FL", "Orlando, FL", "Tampa, FL", "Macon, GA", "Athens, GA", "Topeka, KS",
    "Wichita, KS", "Lawrence, KS", "Columbia, MO", "Joplin, MO", "Des Moines, IA", "Iowa City, IA", "Sioux Falls, SD",
    "Rapid City, SD", "Flagstaff, AZ", "Yuma, AZ", "Bakersfield, CA", "Modesto, CA", "Salinas, CA", "Redding, CA",
    "Tacoma, WA", "Olympia, WA", "Bend, OR", "Salem, OR", "Anchorage, AK", "Honolulu, HI", "Little Rock, AR",
]

UNIVERSITIES = [
    "Princeton University", "Yale University", "Brown University", "Cornell University", "Duke University",
    "Rice University", "Tufts University", "Emory University", "Vanderbilt University", "Tulane University",
    "Purdue University", "Clemson University", "Auburn University", "Baylor University", "Drexel University",
    "Fordham University", "Lehigh University", "Villanova University", "Syracuse University", "Temple University",
    "Howard University", "Gonzaga University", "Creighton University", "Marquette University", "Stanford University",
    "Columbia University", "Harvard University", "Georgetown University", "Northeastern University",
    "Northwestern University", "Carnegie Mellon University", "Johns Hopkins University", "Boston University",
    "Boston College", "Dartmouth College", "Williams College", "Amherst College", "Bowdoin College",
    "Middlebury College", "Oberlin College", "Vassar College", "Wellesley College", "Swarthmore College",
    "Pomona College", "Carleton College", "Grinnell College", "Colby College", "Hamilton College", "Davidson College",
    "Kenyon College", "University of Michigan", "University of Virginia", "University of Florida",
    "University of Georgia", "University of Texas", "University of Oregon", "University of Utah",
    "University of Arizona", "University of Iowa", "University of Kansas", "University of Kentucky",
    "University of Maryland", "University of Minnesota", "University of Missouri", "University of Nebraska",
    "University of Oklahoma", "University of Pittsburgh", "University of Rochester", "University of Vermont",
    "University of Washington", "University of Wisconsin", "University of Colorado", "University of Delaware",
    "University of Alabama", "University of Chicago", "University of Miami", "University of Denver",
    "University of Houston", "University of Idaho", "University of Montana", "Ohio State University",
    "Penn State University", "Michigan State University", "Iowa State University", "Kansas State University",
    "Oregon State University", "Arizona State University", "Florida State University", "Washington State University",
    "Colorado State University", "Georgia Institute of Technology", "California Institute of Technology",
    "Massachusetts Institute of Technology", "Rensselaer Polytechnic Institute", "Worcester Polytechnic Institute",
    "Stevens Institute of Technology", "Rochester Institute of Technology", "Illinois Institute of Technology",
    "New York University", "Wake Forest University",
]

MAJORS = [
    "Communications", "Economics", "Mathematics", "Physics", "Chemistry", "Biology", "History", "Philosophy",
    "Psychology", "Sociology", "Anthropology", "Linguistics", "Geology", "Astronomy", "Statistics", "Architecture",
    "Nursing", "Accounting", "Finance", "Marketing", "Journalism", "Music", "Theater", "Art History", "Film Studies",
    "Computer Science", "Electrical Engineering", "Mechanical Engineering", "Civil Engineering",
    "Chemical Engineering", "Biomedical Engineering", "Aerospace Engineering", "Environmental Science",
    "Political Science", "International Relations", "Public Health", "Neuroscience", "Biochemistry",
    "Marine Biology", "Urban Planning", "Graphic Design", "Creative Writing", "Classics", "Religious Studies",
    "Education", "Nutrition", "Kinesiology", "Agriculture", "Forestry", "Oceanography",
]

_COMPANY_STEMS = """
Northwind Bluecrest Ironbark Silverline Redwood Brightwater Stonegate Clearpath Highmark Greenfield Lumen Vantage
Keystone Summit Harbor Pinnacle Meridian Cobalt Granite Evergreen
""".split()
_COMPANY_KINDS = ["Systems", "Analytics", "Foods", "Logistics", "Energy"]


@cache
def companies(seed: int = 1234) -> tuple[tuple[str, str], ...]:
    """(company, headquarters city) pairs: 20 stems x 5 kinds = 100 companies, HQ fixed by `seed`."""
    rng = random.Random(seed)
    names = [f"{stem} {kind}" for stem in _COMPANY_STEMS for kind in _COMPANY_KINDS]
    return tuple((name, rng.choice(CITIES)) for name in names)
